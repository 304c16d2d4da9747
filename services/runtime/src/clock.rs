//! Time for timers (snooze ends, missed heartbeats): the system clock in
//! production, a manual clock in tests, so no test waits in real time.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};
use tokio::sync::watch;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
    /// Resolves when `until` has come (or a little before, for the caller to
    /// check again), or after a while with `None`.
    fn wait(&self, until: Option<Timestamp>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// Wall-clock time.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    fn wait(&self, until: Option<Timestamp>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let d = until
            .map(|u| u.duration_since(Timestamp::now()))
            .map(|d| d.clamp(SignedDuration::ZERO, SignedDuration::from_secs(60)))
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::from_secs(60));
        Box::pin(tokio::time::sleep(d))
    }
}

/// A clock that moves only when told to.
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<Mutex<Timestamp>>,
    tx: Arc<watch::Sender<Timestamp>>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        let (tx, _) = watch::channel(start);
        ManualClock {
            now: Arc::new(Mutex::new(start)),
            tx: Arc::new(tx),
        }
    }

    pub fn advance(&self, by: SignedDuration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = now.checked_add(by).expect("clock in range");
        self.tx.send_replace(*now);
    }

    pub fn set(&self, to: Timestamp) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = to;
        self.tx.send_replace(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self, until: Option<Timestamp>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let mut rx = self.tx.subscribe();
        Box::pin(async move {
            loop {
                if until.is_some_and(|u| *rx.borrow_and_update() >= u) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        })
    }
}
