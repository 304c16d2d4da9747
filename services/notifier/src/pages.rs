//! Pages from NOTIFY: one durable work-queue consumer every replica shares.
//! Each page is handled in its own task; nothing here limits how many are
//! held but the consumer's `max_ack_pending`, because the lanes decide who
//! waits ([`crate::lanes`]): a page whose turn is far away goes back to the
//! bus instead of holding a slot that another destination could use.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy},
};
use tocsin_proto::{
    codec::decode_envelope,
    notify::Page,
    subjects::{self, STREAM_NOTIFY},
};
use tocsin_runtime::admin::Health;
use tokio_util::sync::CancellationToken;

use crate::{
    consumer::{self, Next},
    deliver::{Deliverer, Finish, Job},
};

/// The durable consumer every replica shares for pages.
pub const PAGES_CONSUMER: &str = "tocsin-notifier";

pub(crate) async fn run(
    d: Arc<Deliverer>,
    ack_wait: Duration,
    held: usize,
    health: Health,
    shutdown: CancellationToken,
) {
    let config = pull::Config {
        durable_name: Some(PAGES_CONSUMER.into()),
        description: Some("Tocsin notifier: pages to deliver (shared by replicas)".into()),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        max_ack_pending: (held * 4) as i64,
        filter_subject: subjects::NOTIFY_SUBJECTS.into(),
        ..Default::default()
    };
    let tasks = tokio_util::task::TaskTracker::new();
    'open: while let Some(mut messages) =
        consumer::open(&d.js, STREAM_NOTIFY, &config, held.min(256), &shutdown).await
    {
        health.set_ok("notifier");
        loop {
            match consumer::next(&mut messages, PAGES_CONSUMER, &shutdown).await {
                Next::Message(msg) => {
                    let (d, stop) = (d.clone(), shutdown.clone());
                    tasks.spawn(async move { handle(d, *msg, ack_wait, stop).await });
                }
                Next::Reopen => continue 'open,
                Next::Stop => break 'open,
            }
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
    shutdown: CancellationToken,
) {
    let page = match decode_envelope::<Page>(&msg.payload) {
        Ok(env) => env.body,
        Err(e) => {
            dead_letter(&d, &msg, &format!("not a page: {e}")).await;
            consumer::finish(&msg, Finish::Ack).await;
            return;
        }
    };
    let alive = consumer::keep_alive(&msg, ack_wait);
    let f = d.deliver(&Job::page(page), &shutdown).await;
    alive.abort();
    consumer::finish(&msg, f).await;
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
        seq,
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
