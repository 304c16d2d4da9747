//! Durable pull consumers that keep pulling: the work-queue consumers the
//! notifier, remediation and the incidents service's commands share with
//! their replicas.
//!
//! async-nats's pull stream asks the server for more only when the batch it
//! asked for is used up or its request expires. A pull request nobody
//! answers ("no responders": on a cluster, a consumer just created by
//! another replica on another node, before its leader listens) is never
//! asked again until the expiry, 35 s later, and a request the server
//! dropped shows only as missed heartbeats; meanwhile the consumer's
//! messages go to the other replicas or wait. [`Puller`] opens the consumer
//! again, and so pulls again, after either.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, Info},
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::retry::Backoff;

/// How often the server says a waiting pull request is still there; two
/// missed mean it is not.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long one pull request waits for messages.
const EXPIRES: Duration = Duration::from_secs(30);
/// Tries at opening a consumer before each failure is a warning (about
/// 3 s of [`Backoff::standard`]).
const OPEN_QUIETLY: u32 = 6;

/// One durable pull consumer on `stream`, created or updated to its
/// configuration when opened, pulled up to `batch` messages at a time.
pub struct Puller {
    js: jetstream::Context,
    stream: String,
    config: pull::Config,
    batch: usize,
    messages: Option<pull::Stream>,
    /// Paces opening again after a pull that went nowhere.
    again: Backoff,
}

impl Puller {
    pub fn new(js: &jetstream::Context, stream: &str, config: pull::Config, batch: usize) -> Self {
        Puller {
            js: js.clone(),
            stream: stream.to_string(),
            config,
            batch: batch.max(1),
            messages: None,
            again: Backoff::standard(),
        }
    }

    /// The consumer's durable name.
    pub fn name(&self) -> &str {
        self.config.durable_name.as_deref().unwrap_or("")
    }

    /// Creates (or updates) the consumer and starts pulling; retries until
    /// NATS and the stream are there. The consumer's information as
    /// created; None once `shutdown` is cancelled.
    pub async fn open(&mut self, shutdown: &CancellationToken) -> Option<Info> {
        let mut backoff = Backoff::standard();
        for attempt in 1u32.. {
            match self.try_open().await {
                Ok((info, messages)) => {
                    self.messages = Some(messages);
                    return Some(info);
                }
                // NATS or the stream coming up takes a few tries; more
                // than that is worth saying (a permission, a stream gone).
                Err(e) if attempt < OPEN_QUIETLY => tracing::debug!(
                    error = %e,
                    stream = %self.stream,
                    consumer = self.name(),
                    "consumer not available yet; retrying"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    stream = %self.stream,
                    consumer = self.name(),
                    attempt,
                    "cannot open the consumer; retrying"
                ),
            }
            if !backoff.wait(shutdown).await {
                return None;
            }
        }
        None
    }

    async fn try_open(&self) -> Result<(Info, pull::Stream), String> {
        let consumer = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| e.to_string())?
            .create_consumer(self.config.clone())
            .await
            .map_err(|e| e.to_string())?;
        let info = consumer.cached_info().clone();
        let messages = consumer
            .stream()
            .max_messages_per_batch(self.batch)
            .heartbeat(HEARTBEAT)
            .expires(EXPIRES)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        Ok((info, messages))
    }

    /// The next message (opening the consumer first if it is not open);
    /// None once `shutdown` is cancelled. Never ends otherwise: a pull that
    /// went nowhere, a consumer deleted or a stream that ended opens the
    /// consumer again.
    pub async fn next(&mut self, shutdown: &CancellationToken) -> Option<jetstream::Message> {
        loop {
            let messages = match self.messages.as_mut() {
                Some(m) => m,
                None => {
                    self.open(shutdown).await?;
                    continue;
                }
            };
            let m = tokio::select! {
                _ = shutdown.cancelled() => return None,
                m = messages.next() => m,
            };
            let why = match m {
                Some(Ok(msg)) => {
                    self.again.reset();
                    return Some(msg);
                }
                // A request that could not be sent is sent again, and a
                // status the client could not read changes nothing.
                Some(Err(e))
                    if matches!(
                        e.kind(),
                        pull::MessagesErrorKind::Pull | pull::MessagesErrorKind::Other
                    ) =>
                {
                    tracing::warn!(error = %e, consumer = self.name(), "consumer error");
                    continue;
                }
                Some(Err(e)) => e.to_string(),
                None => "the pull stream ended".to_string(),
            };
            tracing::info!(
                reason = %why,
                consumer = self.name(),
                "the consumer's pull went nowhere; opening it again"
            );
            self.messages = None;
            if !self.again.wait(shutdown).await {
                return None;
            }
        }
    }

    /// The messages as a stream that ends only once `shutdown` is
    /// cancelled.
    pub fn into_stream(
        self,
        shutdown: CancellationToken,
    ) -> impl futures::Stream<Item = jetstream::Message> {
        futures::stream::unfold(self, move |mut puller| {
            let shutdown = shutdown.clone();
            async move {
                let msg = puller.next(&shutdown).await?;
                Some((msg, puller))
            }
        })
    }
}

/// Tells JetStream the message is still being worked on (waiting for its
/// turn, or in a slow request), so it is not redelivered meanwhile; until
/// the handle is aborted.
pub fn keep_alive(msg: &jetstream::Message, ack_wait: Duration) -> tokio::task::JoinHandle<()> {
    let (client, reply) = (msg.context.client(), msg.reply.clone());
    tokio::spawn(async move {
        let Some(reply) = reply else { return };
        let every = (ack_wait / 3).max(Duration::from_millis(200));
        loop {
            tokio::time::sleep(every).await;
            let _ = client.publish(reply.clone(), "+WPI".into()).await;
        }
    })
}

/// How many items (commands, pages) a message of several says it holds in
/// its `Tocsin-Items` header, read without decoding it; 1 without one or
/// with one that is not a positive number. A hint for scheduling and
/// room, never trusted for more than that: the caller bounds it.
pub fn items_in(msg: &async_nats::Message) -> u64 {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(tocsin_proto::subjects::headers::ITEMS))
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .unwrap_or(1)
        .max(1)
}

/// Deletes a consumer an older version used, if it is there.
pub async fn retire(js: &jetstream::Context, stream: &str, name: &str) {
    if let Ok(s) = js.get_stream(stream).await {
        if s.consumer_info(name).await.is_ok() {
            match s.delete_consumer(name).await {
                Ok(_) => {
                    tracing::info!(consumer = name, "removed a consumer an older version used")
                }
                Err(e) => {
                    tracing::warn!(consumer = name, error = %e, "cannot remove an old consumer")
                }
            }
        }
    }
}
