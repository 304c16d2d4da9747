//! The one request/reply query loop every service answers queries with
//! (`tocsin.query.*`: the CLI, chat-ops and the HTTP API ask them). A
//! queue group per service, so one replica answers each query; the
//! subscriptions are flushed before the service reports ready.

use std::future::Future;

use async_nats::{Client, Subscriber};
use bytes::Bytes;
use futures::{stream::SelectAll, StreamExt};
use tokio_util::sync::CancellationToken;

/// A service's query subscriptions.
pub struct Queries {
    client: Client,
    subs: SelectAll<Subscriber>,
}

impl Queries {
    /// Subscribes to `subjects` in queue group `queue` and makes sure the
    /// server has the subscriptions.
    pub async fn subscribe(
        client: &Client,
        queue: &str,
        subjects: &[&str],
    ) -> Result<Queries, async_nats::SubscribeError> {
        let mut subs = Vec::with_capacity(subjects.len());
        for subject in subjects {
            subs.push(
                client
                    .queue_subscribe(subject.to_string(), queue.to_string())
                    .await?,
            );
        }
        client.flush().await.map_err(|e| {
            async_nats::SubscribeError::with_source(
                async_nats::client::SubscribeErrorKind::Other,
                e,
            )
        })?;
        Ok(Queries {
            client: client.clone(),
            subs: futures::stream::select_all(subs),
        })
    }

    /// Answers queries one at a time until `shutdown`: `answer` gets the
    /// subject and payload and gives the encoded reply (an error only when
    /// the reply cannot be encoded: logged, and the asker times out).
    /// Requests without a reply subject are ignored.
    pub async fn serve<F, Fut>(mut self, shutdown: CancellationToken, mut answer: F)
    where
        F: FnMut(String, Bytes) -> Fut,
        Fut: Future<Output = Result<Vec<u8>, String>>,
    {
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = self.subs.next() => match m { Some(m) => m, None => return },
            };
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            match answer(msg.subject.to_string(), msg.payload).await {
                Ok(bytes) => {
                    if let Err(e) = self.client.publish(reply, bytes.into()).await {
                        tracing::warn!(error = %e, subject = %msg.subject, "cannot answer a query");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, subject = %msg.subject, "cannot encode a query answer")
                }
            }
        }
    }
}
