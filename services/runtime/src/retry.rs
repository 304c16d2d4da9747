//! The one retry pacing every service loop uses while something outside it
//! (NATS, JetStream, a stream not created yet) is not available: a delay
//! that starts small and doubles up to a cap, slept in real time (it paces
//! the retrying, it is not a deadline the engine keeps), and cut short by
//! shutdown.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential backoff without jitter (the retried thing is the local
/// NATS server, not a shared remote API; the notifier's provider retries
/// have jitter and `Retry-After`, see its `guard`).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// From `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            next: initial,
            max: max.max(initial),
        }
    }

    /// 100 ms doubling up to 2 s: what the services' loops use for NATS.
    pub fn standard() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
    }

    /// The delay the next [`Backoff::wait`] sleeps.
    pub fn delay(&self) -> Duration {
        self.next
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// Takes the next delay and doubles the one after it (up to the cap).
    pub fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Sleeps the next delay; false if `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.step();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let steps: Vec<u128> = (0..5).map(|_| b.step().as_millis()).collect();
        assert_eq!(steps, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.delay(), Duration::from_millis(100));
        let mut odd = Backoff::new(Duration::from_secs(3), Duration::from_secs(1));
        assert_eq!(
            (odd.step(), odd.step()),
            (Duration::from_secs(3), Duration::from_secs(3))
        );
    }

    #[tokio::test]
    async fn shutdown_cuts_the_wait_short() {
        let stop = CancellationToken::new();
        stop.cancel();
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        assert!(
            !b.wait(&stop).await,
            "a cancelled token ends the wait at once"
        );
    }
}
