//! Pages from NOTIFY: one durable work-queue consumer per channel
//! (`tocsin-notifier-sms`, `-email`, `-slack`, `-pagerduty`, `-webhook`),
//! each shared by every replica. A page handed back to wait for its turn
//! still counts against its consumer's `max_ack_pending` until it comes
//! back, so a channel's backlog can only ever fill its own consumer: SMS
//! never waits for PagerDuty's rate limit. Within a channel the lanes
//! ([`crate::lanes`]) keep one destination from holding more than its
//! share. Each message is handled in its own task: a page, or the pages
//! of an escalation burst for one destination of this channel (up to 64, on
//! `tocsin.notify.<channel>.batch`), worked on at once and acknowledged
//! together.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{pull::Config, AckPolicy},
};
use tocsin_proto::{codec::decode_pages, notify::Channel, subjects::STREAM_NOTIFY};
use tocsin_runtime::{
    admin::Health,
    pull::{self, Puller},
};
use tokio_util::sync::CancellationToken;

use crate::{
    consumer,
    deliver::{Deliverer, Finish, Job},
    records,
};

/// The prefix of the durable consumers every replica shares for pages:
/// `tocsin-notifier-<channel>`.
pub const PAGES_CONSUMER: &str = "tocsin-notifier";

/// The channels, each with its consumer.
const CHANNELS: [Channel; 5] = [
    Channel::Sms,
    Channel::Email,
    Channel::Slack,
    Channel::Pagerduty,
    Channel::Webhook,
];

pub(crate) async fn run(
    d: Arc<Deliverer>,
    ack_wait: Duration,
    held: usize,
    health: Health,
    shutdown: CancellationToken,
) {
    // The one consumer for every channel older versions used overlaps the
    // per-channel ones, which a work-queue stream does not allow.
    pull::retire(&d.js, STREAM_NOTIFY, PAGES_CONSUMER).await;
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let loops: Vec<_> = CHANNELS
        .iter()
        .map(|c| {
            tokio::spawn(run_channel(
                d.clone(),
                *c,
                ack_wait,
                held,
                health.clone(),
                opened.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    for l in loops {
        let _ = l.await;
    }
}

async fn run_channel(
    d: Arc<Deliverer>,
    channel: Channel,
    ack_wait: Duration,
    held: usize,
    health: Health,
    opened: Arc<std::sync::atomic::AtomicUsize>,
    shutdown: CancellationToken,
) {
    let name = format!("{PAGES_CONSUMER}-{}", channel.as_str());
    let config = Config {
        durable_name: Some(name),
        description: Some(format!(
            "Tocsin notifier: {} pages to deliver (shared by replicas)",
            channel.as_str()
        )),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        max_ack_pending: (held * 4) as i64,
        // Its pages one to a message, and escalation's bursts several.
        filter_subjects: vec![
            tocsin_proto::subjects::notify_subject(channel.as_str()),
            tocsin_proto::subjects::notify_batch_subject(channel.as_str()),
        ],
        ..Default::default()
    };
    let tasks = tokio_util::task::TaskTracker::new();
    // Pages decoded and worked on at once by this replica for this
    // channel: as many as the consumer lets messages be pending (four
    // times `held`), which a message of a burst (up to 64 pages) would
    // otherwise multiply. A page being worked on holds its incident, its
    // rendered message and its records; the messages beyond wait
    // undecoded, as they came. Lanes hold at most half of `held` each, so
    // eight backlogged destinations of a channel are needed to hold up a
    // ninth.
    let allowance = held.saturating_mul(4);
    let working = Arc::new(tokio::sync::Semaphore::new(allowance));
    let mut pages = Puller::new(&d.js, STREAM_NOTIFY, config, held.min(256));
    if pages.open(&shutdown).await.is_some() {
        if opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == CHANNELS.len() {
            health.set_ok("notifier");
        }
        while let Some(msg) = pages.next(&shutdown).await {
            let (d, stop, working) = (d.clone(), shutdown.clone(), working.clone());
            tasks.spawn(async move { handle(d, msg, ack_wait, (&working, allowance), stop).await });
        }
    }
    // Let deliveries in flight finish (the app's grace period bounds this).
    tasks.close();
    tasks.wait().await;
}

async fn handle(
    d: Arc<Deliverer>,
    msg: jetstream::Message,
    ack_wait: Duration,
    (working, allowance): (&tokio::sync::Semaphore, usize),
    shutdown: CancellationToken,
) {
    let alive = pull::keep_alive(&msg, ack_wait);
    // A permit a page (a burst larger than the whole allowance takes all
    // of it), given back once its pages are done, before the message is
    // acknowledged or handed back. The message waits for them as it came,
    // undecoded: a burst's message says how many pages it holds in
    // `Tocsin-Items`, so the pages waiting for room are never more than
    // the allowance, however many messages the consumer has handed over.
    let said = permits_for(pull::items_in(&msg), allowance);
    let Some(mut permits) = room(working, said, &shutdown).await else {
        return at_shutdown(&msg, alive).await;
    };
    let pages = match decode_pages(msg.subject.as_str(), &msg.payload) {
        Ok(env) => env.body,
        Err(e) => {
            drop(permits);
            alive.abort();
            dead_letter(&d, &msg, &format!("not a page: {e}")).await;
            consumer::finish(&msg, Finish::Ack).await;
            return;
        }
    };
    let want = pages.len().clamp(1, allowance);
    if want > permits.num_permits() {
        // It holds more pages than it said (a hand-made message): room for
        // all of them, asked afresh so that no message waits while it
        // holds part of the room.
        drop(permits);
        let Some(all) = room(working, want, &shutdown).await else {
            return at_shutdown(&msg, alive).await;
        };
        permits = all;
    }
    // A message of several pages (a burst's, for one destination of this
    // channel; an older escalation's, for any): all at once, each with a permit of its own, given back as soon as that page
    // is done (sent, failed, or to come again), with the page itself. So
    // a page that waits in place for its destination's next turn holds
    // only its own room, not that of the pages sent beside it: the
    // messages behind, for other destinations, get it. The message is
    // handed back whole if any must come again (the soonest); those
    // already sent then find their delivery records and are not sent
    // twice. (Pages beyond the whole room, a message larger than it, go
    // without a permit; permits beyond the pages, a message that said
    // more than it holds, are given back now.) A page told to come again
    // after a while is due that long after it was told, on the clock, not
    // after the message is handed back: a page whose turn was a minute
    // away, in a message whose other pages waited that minute in place,
    // is due at once.
    let each: Vec<_> = pages.iter().map(|_| permits.split(1)).collect();
    drop(permits);
    let (d, shutdown) = (&d, &shutdown);
    let done = futures::future::join_all(pages.into_iter().zip(each).map(
        |(page, permit)| async move {
            let job = Job::page(page);
            let f = d.deliver(&job, shutdown).await;
            drop(permit);
            let key = (f == Finish::Ack).then(|| records::key(&job.about.incident, &job.id));
            (Due::of(f, d.clock.now()), key)
        },
    ))
    .await;
    let due = done
        .iter()
        .map(|(due, _)| *due)
        .fold(Due::Done, Due::sooner);
    if due != Due::Done {
        // The pages sent are acknowledged at once when it comes back.
        d.finished_in_handed_back(done.into_iter().filter_map(|(_, key)| key));
    }
    alive.abort();
    consumer::finish(&msg, due.finish(d.clock.now())).await;
}

/// The shortest a message of several pages is handed back for, however
/// long ago its soonest page was due: its next delivery is no tighter loop
/// than this.
const SHORTEST_HAND_BACK: Duration = Duration::from_millis(100);

/// When a message of pages is due again: never (every page is done), or
/// at the soonest time one of its pages was told to come again, on the
/// notifier's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Done,
    At(jiff::Timestamp),
}

impl Due {
    /// A page's outcome, decided at `now`.
    fn of(f: Finish, now: jiff::Timestamp) -> Due {
        match f {
            Finish::Ack => Due::Done,
            Finish::Later(d) => Due::At(
                jiff::SignedDuration::try_from(d)
                    .ok()
                    .and_then(|d| now.checked_add(d).ok())
                    .unwrap_or(jiff::Timestamp::MAX),
            ),
        }
    }

    fn sooner(self, other: Due) -> Due {
        match (self, other) {
            (Due::Done, x) | (x, Due::Done) => x,
            (Due::At(a), Due::At(b)) => Due::At(a.min(b)),
        }
    }

    /// What to do with the message at `now`: acknowledged, or handed back
    /// for what is left of the wait (at least [`SHORTEST_HAND_BACK`]).
    fn finish(self, now: jiff::Timestamp) -> Finish {
        match self {
            Due::Done => Finish::Ack,
            Due::At(at) => Finish::Later(
                Duration::try_from(at.duration_since(now))
                    .unwrap_or(Duration::ZERO)
                    .max(SHORTEST_HAND_BACK),
            ),
        }
    }
}

/// The permits a message of pages waits for before it is decoded: the
/// pages its `Tocsin-Items` header says it holds (`items`, 1 for a page on
/// its own or a header that says nothing usable), at most the whole
/// allowance.
fn permits_for(items: u64, allowance: usize) -> usize {
    usize::try_from(items)
        .unwrap_or(usize::MAX)
        .clamp(1, allowance.max(1))
}

/// A message that got no room before shutdown: handed back for another
/// replica, or this one after its restart.
async fn at_shutdown(msg: &jetstream::Message, alive: tokio::task::JoinHandle<()>) {
    alive.abort();
    consumer::finish(msg, Finish::Later(Duration::from_secs(1))).await;
}

/// `n` permits of the room, or `None` at shutdown.
async fn room<'a>(
    working: &'a tokio::sync::Semaphore,
    n: usize,
    shutdown: &CancellationToken,
) -> Option<tokio::sync::SemaphorePermit<'a>> {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    tokio::select! {
        p = working.acquire_many(n) => p.ok(),
        _ = shutdown.cancelled() => None,
    }
}

async fn dead_letter(d: &Deliverer, msg: &jetstream::Message, reason: &str) {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    // One attempt: if it fails the message is acked anyway (it can never
    // be processed), and the error below says so.
    if let Err(e) = tocsin_runtime::streams::dead_letter(
        &d.js,
        STREAM_NOTIFY,
        msg.subject.as_str(),
        msg.payload.clone(),
        &seq.to_string(),
        reason,
    )
    .await
    {
        tracing::warn!(error = %e, "cannot dead-letter a message");
    }
    d.metrics.dead_letters.inc();
    tracing::error!(
        seq,
        reason,
        "undecodable NOTIFY message moved to the dead-letter stream"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_waits_for_room_for_the_pages_it_says_it_holds() {
        assert_eq!(permits_for(64, 1024), 64);
        // A page on its own (`items_in` is 1 without a usable header).
        assert_eq!(permits_for(1, 1024), 1);
        // Never more than the whole room, or the message would never get it.
        assert_eq!(permits_for(100_000, 128), 128);
        assert_eq!(permits_for(u64::MAX, 128), 128);
        assert_eq!(permits_for(2, 0), 1);
    }

    #[test]
    fn a_page_handed_back_is_due_counted_from_when_it_was_told() {
        let t0 = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        let at = |s: i64| t0.checked_add(jiff::SignedDuration::from_secs(s)).unwrap();
        let later = |s: u64| Finish::Later(Duration::from_secs(s));
        // Told at t0 to come again in 60 s, handed back 60 s later beside
        // a page that waited in place: due at once.
        let due = Due::of(later(60), t0).sooner(Due::of(Finish::Ack, at(60)));
        assert_eq!(due.finish(at(60)), Finish::Later(SHORTEST_HAND_BACK));
        assert_eq!(due.finish(at(45)), later(15));
        // The soonest of two, each from when it was told.
        let due = Due::of(later(30), t0).sooner(Due::of(later(5), at(40)));
        assert_eq!(due, Due::At(at(30)));
        assert_eq!(due.finish(at(10)), later(20));
        assert_eq!(Due::Done.sooner(Due::Done).finish(t0), Finish::Ack);
        // A wait no timestamp holds is never a panic.
        assert_eq!(
            Due::of(Finish::Later(Duration::MAX), t0),
            Due::At(jiff::Timestamp::MAX)
        );
    }

    #[tokio::test]
    async fn room_is_given_once_free_and_not_at_shutdown() {
        let working = tokio::sync::Semaphore::new(4);
        let stop = CancellationToken::new();
        let held = room(&working, 3, &stop).await.expect("free room");
        assert_eq!(held.num_permits(), 3);
        assert_eq!(working.available_permits(), 1);
        stop.cancel();
        // Two more than are free: only the shutdown answers.
        assert!(room(&working, 3, &stop).await.is_none());
        drop(held);
        assert_eq!(working.available_permits(), 4);
    }
}
