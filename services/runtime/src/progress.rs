//! Watermarks: how far each service has got.
//!
//! A service loop reports, in one step each time it is about to wait
//! ([`Watermark::report`]), how far it has handled each stream it reads
//! and when its next timer is due. "Handled" means the effects are durable
//! (published and acknowledged by JetStream). So once a service's mark
//! covers a stream's last sequence and its next timer lies after the
//! clock's time, nothing that is due has been left undone.
//!
//! Tests use it to wait for the engine to settle after moving the clock
//! instead of sleeping and hoping.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use jiff::Timestamp;
use tokio::sync::watch;

/// One service's progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    /// Per stream: every message up to this stream sequence is handled.
    pub streams: BTreeMap<String, u64>,
    /// When the next timer is due (`Timestamp::MAX`: none is pending);
    /// every timer due before it has fired. `None` until the first report.
    pub next_timer: Option<Timestamp>,
}

impl Mark {
    /// How far `stream` has been handled (0: nothing yet).
    pub fn read(&self, stream: &str) -> u64 {
        self.streams.get(stream).copied().unwrap_or(0)
    }

    /// Whether every timer due at or before `t` has fired.
    pub fn timers_reached(&self, t: Timestamp) -> bool {
        self.next_timer.is_some_and(|next| next > t)
    }
}

/// The progress of every service in a process.
#[derive(Clone)]
pub struct Progress {
    tx: Arc<watch::Sender<BTreeMap<String, Mark>>>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tx: Arc::new(watch::Sender::new(BTreeMap::new())),
        }
    }

    /// The handle one service reports through.
    pub fn of(&self, service: &str) -> Watermark {
        Watermark {
            service: service.to_owned(),
            tx: self.tx.clone(),
        }
    }

    /// Every service's mark, as it changes.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, Mark>> {
        self.tx.subscribe()
    }

    /// Keeps `tocsin_handled_sequence{service,stream}` in `metrics` at
    /// every service's mark until `shutdown`.
    pub async fn export(
        &self,
        metrics: crate::admin::Metrics,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut rx = self.subscribe();
        loop {
            let marks = rx.borrow_and_update().clone();
            for (service, mark) in &marks {
                for (stream, seq) in &mark.streams {
                    let l = crate::admin::labels(&[("service", service), ("stream", stream)]);
                    metrics
                        .handled
                        .get_or_create(&l)
                        .set(i64::try_from(*seq).unwrap_or(i64::MAX));
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    }

    /// The current mark of `service`.
    pub fn mark(&self, service: &str) -> Mark {
        self.tx.borrow().get(service).cloned().unwrap_or_default()
    }

    /// Waits until `service`'s mark satisfies `done`, at most `limit`;
    /// on timeout returns the last mark seen.
    pub async fn wait_until(
        &self,
        service: &str,
        limit: Duration,
        done: impl Fn(&Mark) -> bool,
    ) -> Result<Mark, Mark> {
        let mut rx = self.tx.subscribe();
        let reached = tokio::time::timeout(limit, async {
            rx.wait_for(|all| done(all.get(service).unwrap_or(&Mark::default())))
                .await
                .map(|all| all.get(service).cloned().unwrap_or_default())
        })
        .await;
        match reached {
            Ok(Ok(mark)) => Ok(mark),
            _ => Err(self.mark(service)),
        }
    }
}

/// One service's reporting handle.
#[derive(Clone)]
pub struct Watermark {
    service: String,
    tx: Arc<watch::Sender<BTreeMap<String, Mark>>>,
}

impl Watermark {
    /// A handle nobody reads (a service started on its own).
    pub fn detached(service: &str) -> Watermark {
        Progress::new().of(service)
    }

    /// In one step: every message of each `(stream, seq)` up to `seq` is
    /// handled, and the next timer is due at `next_timer` (`None`: no timer
    /// is pending). Stream marks only move forward; the next timer moves
    /// either way (a new input can bring a deadline closer).
    pub fn report(&self, streams: &[(&str, u64)], next_timer: Option<Timestamp>) {
        let next = next_timer.unwrap_or(Timestamp::MAX);
        self.tx.send_if_modified(|all| {
            let mark = all.entry(self.service.clone()).or_default();
            let mut changed = mark.next_timer != Some(next);
            mark.next_timer = Some(next);
            for &(stream, seq) in streams {
                let at = mark.streams.entry(stream.to_owned()).or_default();
                if *at < seq {
                    *at = seq;
                    changed = true;
                }
            }
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn marks_report_streams_and_the_next_timer_and_wake_waiters() {
        let progress = Progress::new();
        let wm = progress.of("escalation");
        assert!(!progress.mark("escalation").timers_reached(Timestamp::MIN));
        let (t1, t2) = (
            Timestamp::from_second(1_000).unwrap(),
            Timestamp::from_second(2_000).unwrap(),
        );
        wm.report(&[("INCIDENTS", 5)], Some(t2));
        wm.report(&[("INCIDENTS", 3)], Some(t1));
        let mark = progress.mark("escalation");
        assert_eq!(mark.read("INCIDENTS"), 5, "streams only move forward");
        assert!(mark.timers_reached(Timestamp::from_second(999).unwrap()));
        assert!(!mark.timers_reached(t1), "a timer due at t1 is pending");
        wm.report(&[], None);
        assert!(progress.mark("escalation").timers_reached(t2));

        let waiter = {
            let progress = progress.clone();
            tokio::spawn(async move {
                progress
                    .wait_until("escalation", Duration::from_secs(5), |m| {
                        m.read("INCIDENTS") >= 9
                    })
                    .await
            })
        };
        wm.report(&[("INCIDENTS", 9)], None);
        let mark = waiter.await.unwrap().expect("woken by the mark");
        assert_eq!(mark.read("INCIDENTS"), 9);
        let late = progress
            .wait_until("escalation", Duration::from_millis(10), |m| {
                m.read("INCIDENTS") >= 10
            })
            .await;
        assert_eq!(late.unwrap_err().read("INCIDENTS"), 9);
    }
}
