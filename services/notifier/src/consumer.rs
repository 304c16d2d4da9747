//! What both loops share: opening a durable consumer (retried until NATS
//! and the stream are there), taking the next message without ever ending
//! silently, keeping a message alive while it is worked on, and finishing
//! it (ack, or hand back with a delay).

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::deliver::Finish;

/// Pulls from a durable consumer, creating it or updating it to `config`;
/// retries until NATS and the stream are there (None once `shutdown` is
/// cancelled).
pub(crate) async fn open(
    js: &jetstream::Context,
    stream: &str,
    config: &pull::Config,
    batch: usize,
    shutdown: &CancellationToken,
) -> Option<pull::Stream> {
    let open = || async {
        js.get_stream(stream)
            .await
            .map_err(|e| e.to_string())?
            .create_consumer(config.clone())
            .await
            .map_err(|e| e.to_string())?
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| e.to_string())
    };
    let mut backoff = tocsin_runtime::retry::Backoff::standard();
    loop {
        match open().await {
            Ok(m) => return Some(m),
            Err(e) => tracing::debug!(error = %e, stream, "consumer not available yet; retrying"),
        }
        if !backoff.wait(shutdown).await {
            return None;
        }
    }
}

/// Deletes a consumer an older version used, if it is there.
pub(crate) async fn retire(js: &jetstream::Context, stream: &str, name: &str) {
    if let Ok(s) = js.get_stream(stream).await {
        if s.consumer_info(name).await.is_ok() {
            match s.delete_consumer(name).await {
                Ok(_) => tracing::info!(
                    consumer = name,
                    "removed the consumer an older notifier used"
                ),
                Err(e) => {
                    tracing::warn!(consumer = name, error = %e, "cannot remove an old consumer")
                }
            }
        }
    }
}

/// What a consumer loop does next.
pub(crate) enum Next {
    Message(Box<jetstream::Message>),
    /// The consumer went away (deleted, stream ended): open it again.
    Reopen,
    Stop,
}

/// The next message; transient errors are logged and skipped, never the
/// silent end of the loop.
pub(crate) async fn next(
    messages: &mut pull::Stream,
    what: &str,
    shutdown: &CancellationToken,
) -> Next {
    loop {
        let m = tokio::select! {
            _ = shutdown.cancelled() => return Next::Stop,
            m = messages.next() => m,
        };
        match m {
            Some(Ok(msg)) => return Next::Message(Box::new(msg)),
            Some(Err(e)) => {
                tracing::warn!(error = %e, consumer = what, "consumer error");
                if matches!(e.kind(), pull::MessagesErrorKind::ConsumerDeleted) {
                    return Next::Reopen;
                }
            }
            None => return Next::Reopen,
        }
    }
}

/// Tells JetStream the message is still being worked on (waiting for its
/// turn, or in a slow request), so it is not redelivered meanwhile.
pub(crate) fn keep_alive(
    msg: &jetstream::Message,
    ack_wait: Duration,
) -> tokio::task::JoinHandle<()> {
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

/// Acknowledges (for good) or hands back with a delay.
pub(crate) async fn finish(msg: &jetstream::Message, f: Finish) {
    let r = match f {
        Finish::Ack => msg.double_ack().await,
        Finish::Later(d) => msg.ack_with(AckKind::Nak(Some(d))).await,
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot acknowledge a message; it will be redelivered and found in the delivery records");
    }
}
