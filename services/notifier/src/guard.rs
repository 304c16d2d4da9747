//! Per-provider guards: circuit breaker, pacing (a rate limit that hands
//! out turns) and retry backoff. Plain data over times from the injected
//! clock, tested without a provider.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp as Instant};

use crate::config::{BreakerConfig, RetryConfig};

/// Breaker state, as `/metrics` shows it (0 closed, 1 half-open, 2 open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Probes are let through one at a time; `successes` in a row close it.
    HalfOpen,
    Open {
        until: Instant,
    },
}

/// A circuit breaker: closed -> open after `failures` consecutive failures;
/// open -> half-open after `open_for`; half-open -> closed after `successes`
/// successes in a row, or open again on a failure.
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: BreakerState,
    failures: u32,
    successes: u32,
    /// A half-open probe is in flight: others wait.
    probing: bool,
}

/// What a caller may do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Permit {
    /// Send. `probe` is true when this is a half-open probe.
    Go { probe: bool },
    /// Wait this long, then ask again.
    Wait(Duration),
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Breaker {
            cfg,
            state: BreakerState::Closed,
            failures: 0,
            successes: 0,
            probing: false,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn permit(&mut self, now: Instant) -> Permit {
        if let BreakerState::Open { until } = self.state {
            if now < until {
                return Permit::Wait(until_from(now, until));
            }
            self.state = BreakerState::HalfOpen;
            self.successes = 0;
            self.probing = false;
        }
        match self.state {
            BreakerState::Closed => Permit::Go { probe: false },
            BreakerState::HalfOpen if !self.probing => {
                self.probing = true;
                Permit::Go { probe: true }
            }
            _ => Permit::Wait(Duration::from_millis(200)),
        }
    }

    /// The provider answered (a success, or a refusal that is not an outage).
    pub fn success(&mut self) {
        self.failures = 0;
        self.probing = false;
        if self.state == BreakerState::HalfOpen {
            self.successes += 1;
            if self.successes >= self.cfg.successes.max(1) {
                self.state = BreakerState::Closed;
                self.successes = 0;
            }
        }
    }

    /// The provider failed (5xx, 429, timeout, connection refused).
    /// Returns true when this opened the breaker.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.probing = false;
        self.successes = 0;
        let open_for = add(self.cfg.open_for.get().max(Duration::from_millis(10)));
        match self.state {
            BreakerState::HalfOpen => {
                self.state = BreakerState::Open {
                    until: now.saturating_add(open_for).unwrap_or(now),
                };
                true
            }
            BreakerState::Closed => {
                self.failures += 1;
                if self.failures >= self.cfg.failures.max(1) {
                    self.failures = 0;
                    self.state = BreakerState::Open {
                        until: now.saturating_add(open_for).unwrap_or(now),
                    };
                    true
                } else {
                    false
                }
            }
            BreakerState::Open { .. } => false,
        }
    }

    /// A probe ended without an answer either way (e.g. the page was
    /// already sent): let the next one through.
    pub fn release(&mut self) {
        self.probing = false;
    }
}

fn add(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// How long from `now` until `until` (zero when past).
pub fn until_from(now: Instant, until: Instant) -> Duration {
    Duration::try_from(until.duration_since(now)).unwrap_or_default()
}

/// A rate limit that hands out turns (GCRA): one request every
/// `1/rate`, with up to `burst` at once. [`Pace::reserve`] books the next
/// turn and says how long to wait for it, so many pages for one
/// destination wait in line instead of all retrying at once.
#[derive(Debug, Clone)]
pub struct Pace {
    /// `1/rate`: the interval with the whole rate to itself.
    base: SignedDuration,
    burst: u32,
    /// How many replicas share the rate (see [`Pace::share`]).
    share: u32,
    interval: SignedDuration,
    tolerance: SignedDuration,
    /// The theoretical arrival time of the next request.
    tat: Option<Instant>,
}

impl Pace {
    pub fn new(rate_per_second: u32, burst: u32) -> Pace {
        let base = SignedDuration::from_nanos(1_000_000_000 / i64::from(rate_per_second.max(1)));
        let mut p = Pace {
            base,
            burst: burst.max(1),
            share: 0,
            interval: base,
            tolerance: SignedDuration::ZERO,
            tat: None,
        };
        p.share(1);
        p
    }

    /// `replicas` send to the same destination, each at its own pace: this
    /// one takes `1/replicas` of the rate and of the burst (at least one),
    /// so together they stay within the destination's limit. Turns already
    /// booked stay booked.
    pub fn share(&mut self, replicas: u32) {
        let n = replicas.max(1);
        if n == self.share {
            return;
        }
        self.share = n;
        self.interval = self.base * i32::try_from(n).unwrap_or(i32::MAX);
        let burst = (self.burst / n).max(1);
        self.tolerance = self.interval * i32::try_from(burst - 1).unwrap_or(i32::MAX);
    }

    /// Books a turn and returns how long until it, unless that is longer
    /// than `max_wait`: then nothing is booked and `Err` says how long the
    /// wait would be.
    pub fn reserve(&mut self, now: Instant, max_wait: Duration) -> Result<Duration, Duration> {
        let (wait, tat) = self.book(self.tat, now, max_wait)?;
        self.tat = Some(tat);
        Ok(wait)
    }

    /// The provider asked to wait until `until` (a 429): nobody goes before.
    pub fn hold_until(&mut self, until: Instant) {
        self.tat = Some(self.held(self.tat, until));
    }

    /// [`Pace::reserve`] on a `tat` kept elsewhere (the replicas' shared
    /// one): the wait and the `tat` after the booking.
    pub fn book(
        &self,
        tat: Option<Instant>,
        now: Instant,
        max_wait: Duration,
    ) -> Result<(Duration, Instant), Duration> {
        let tat = tat.map_or(now, |t| t.max(now));
        let allowed = tat.checked_sub(self.tolerance).unwrap_or(tat);
        let wait = until_from(now, allowed);
        if wait > max_wait {
            return Err(wait);
        }
        Ok((wait, tat.checked_add(self.interval).unwrap_or(tat)))
    }

    /// [`Pace::hold_until`] on a `tat` kept elsewhere: the `tat` after it.
    pub fn held(&self, tat: Option<Instant>, until: Instant) -> Instant {
        let t = until.checked_add(self.tolerance).unwrap_or(until);
        tat.map_or(t, |x| x.max(t))
    }
}

/// Delay before retry `attempt` (1 = after the first failure): exponential
/// from `initial`, capped at `max`, with ±20 % jitter so many pages
/// waiting on one provider do not retry in lock step. A provider's
/// `Retry-After` wins when it is longer.
pub fn backoff(cfg: &RetryConfig, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let initial = cfg.initial.get().max(Duration::from_millis(10));
    let max = cfg.max.get().max(initial);
    let exp = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let base = exp.min(max);
    let jitter = 0.8 + rand::random::<f64>() * 0.4;
    let delay = base.mul_f64(jitter);
    match retry_after {
        Some(ra) => ra.max(delay.min(ra + Duration::from_millis(250))),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tocsin_runtime::config::HumanDuration;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig::default())
    }

    fn at(s: f64) -> Instant {
        Instant::from_second(1_800_000_000)
            .unwrap()
            .checked_add(SignedDuration::from_secs_f64(s))
            .unwrap()
    }

    #[test]
    fn pace_hands_out_turns_and_refuses_long_waits() {
        let mut p = Pace::new(2, 1);
        let t0 = at(0.0);
        assert_eq!(p.reserve(t0, Duration::from_secs(5)), Ok(Duration::ZERO));
        assert_eq!(
            p.reserve(t0, Duration::from_secs(5)),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(
            p.reserve(t0, Duration::from_secs(5)),
            Ok(Duration::from_secs(1))
        );
        // 10 in line = 5 s: more is refused, and nothing is booked for it.
        for _ in 3..11 {
            p.reserve(t0, Duration::from_secs(5)).unwrap();
        }
        assert_eq!(
            p.reserve(t0, Duration::from_secs(5)),
            Err(Duration::from_millis(5500))
        );
        assert_eq!(
            p.reserve(t0, Duration::from_secs(6)),
            Ok(Duration::from_millis(5500))
        );
        // Idle time is not banked beyond the burst.
        let mut q = Pace::new(1, 3);
        let t = at(100.0);
        for _ in 0..3 {
            assert_eq!(q.reserve(t, Duration::ZERO), Ok(Duration::ZERO));
        }
        assert_eq!(q.reserve(t, Duration::ZERO), Err(Duration::from_secs(1)));
        // Shared by two replicas: half the rate and half the burst each.
        let mut h = Pace::new(2, 4);
        h.share(2);
        let t = at(200.0);
        for _ in 0..2 {
            assert_eq!(h.reserve(t, Duration::ZERO), Ok(Duration::ZERO));
        }
        assert_eq!(h.reserve(t, Duration::ZERO), Err(Duration::from_secs(1)));
        assert_eq!(
            h.reserve(t, Duration::from_secs(5)),
            Ok(Duration::from_secs(1))
        );
        // Alone again: the whole rate and burst from the turns already
        // booked (the next at 3 s, less the burst's 1.5 s).
        h.share(1);
        assert_eq!(
            h.reserve(t, Duration::from_secs(5)),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(
            h.reserve(t, Duration::from_secs(5)),
            Ok(Duration::from_secs(2))
        );
        // A 429 holds everyone back.
        let mut r = Pace::new(10, 1);
        r.hold_until(at(30.0));
        assert_eq!(
            r.reserve(at(0.0), Duration::from_secs(60)),
            Ok(Duration::from_secs(30))
        );
    }

    #[test]
    fn opens_after_five_consecutive_failures() {
        let now = at(0.0);
        let mut b = breaker();
        for i in 0..4 {
            assert!(!b.failure(now), "failure {i}");
            assert_eq!(b.permit(now), Permit::Go { probe: false });
        }
        b.success(); // resets the count
        for _ in 0..4 {
            b.failure(now);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.failure(now));
        assert_eq!(b.permit(now), Permit::Wait(Duration::from_secs(60)));
        assert_eq!(b.permit(at(59.0)), Permit::Wait(Duration::from_secs(1)));
    }

    #[test]
    fn half_open_after_60s_closes_after_two_successes() {
        let t0 = at(0.0);
        let mut b = breaker();
        for _ in 0..5 {
            b.failure(t0);
        }
        let t1 = at(60.0);
        assert_eq!(b.permit(t1), Permit::Go { probe: true });
        // one probe at a time
        assert!(matches!(b.permit(t1), Permit::Wait(_)));
        b.success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.permit(t1), Permit::Go { probe: true });
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.permit(t1), Permit::Go { probe: false });
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let t0 = at(0.0);
        let mut b = breaker();
        for _ in 0..5 {
            b.failure(t0);
        }
        let t1 = at(61.0);
        assert_eq!(b.permit(t1), Permit::Go { probe: true });
        assert!(b.failure(t1));
        assert_eq!(b.permit(t1), Permit::Wait(Duration::from_secs(60)));
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let cfg = RetryConfig {
            initial: HumanDuration::secs(1),
            max: HumanDuration::secs(8),
            give_up_after: HumanDuration::secs(3600),
        };
        let within = |d: Duration, lo: f64, hi: f64| {
            let s = d.as_secs_f64();
            assert!(s >= lo && s <= hi, "{s} not in {lo}..{hi}");
        };
        within(backoff(&cfg, 1, None), 0.8, 1.2);
        within(backoff(&cfg, 2, None), 1.6, 2.4);
        within(backoff(&cfg, 3, None), 3.2, 4.8);
        within(backoff(&cfg, 10, None), 6.4, 9.6);
        within(backoff(&cfg, 40, None), 6.4, 9.6);
        // Retry-After 1 on the third attempt: about a second, not 4 s.
        within(backoff(&cfg, 3, Some(Duration::from_secs(1))), 1.0, 1.25);
        // A longer Retry-After wins.
        within(backoff(&cfg, 1, Some(Duration::from_secs(30))), 30.0, 30.0);
    }
}
