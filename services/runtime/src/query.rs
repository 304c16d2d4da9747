//! The one request/reply query loop every service answers queries with
//! (`tocsin.query.*`: the CLI, chat-ops and the HTTP API ask them). A
//! queue group per service, so one replica answers each query; the
//! server has the subscriptions before the service reports ready.

use std::future::Future;

use async_nats::{Client, Subscriber};
use bytes::Bytes;
use futures::{
    stream::{FuturesUnordered, SelectAll},
    StreamExt,
};
use tokio_util::sync::CancellationToken;

/// A service's query subscriptions.
pub struct Queries {
    client: Client,
    subs: SelectAll<Subscriber>,
}

impl Queries {
    /// Subscribes to `subjects` in queue group `queue` with `js`'s client
    /// and waits until the server has the subscriptions
    /// ([`crate::nats::round_trip`], through `js`'s API prefix).
    pub async fn subscribe(
        js: &async_nats::jetstream::Context,
        queue: &str,
        subjects: &[&str],
    ) -> Result<Queries, async_nats::SubscribeError> {
        let client = js.client();
        let mut subs = Vec::with_capacity(subjects.len());
        for subject in subjects {
            subs.push(
                client
                    .queue_subscribe(subject.to_string(), queue.to_string())
                    .await?,
            );
        }
        crate::nats::round_trip(js).await.map_err(|e| {
            async_nats::SubscribeError::with_source(
                async_nats::client::SubscribeErrorKind::Other,
                e,
            )
        })?;
        Ok(Queries {
            client,
            subs: futures::stream::select_all(subs),
        })
    }

    /// Answers queries until `shutdown`, up to [`IN_FLIGHT`] at once:
    /// `answer` gets the subject and payload and gives the encoded reply
    /// (an error only when the reply cannot be encoded: logged, and the
    /// asker times out). Requests without a reply subject are ignored.
    ///
    /// An answer may wait (the incidents service reads what is in memory
    /// between two of its batches, and the store or the stream): one at a
    /// time, the queries behind it waited too, in a storm for minutes,
    /// until the asker had given up and nats-server refused the late
    /// answer. Beyond [`IN_FLIGHT`] the next queries wait in the
    /// subscription's buffer.
    pub async fn serve<F, Fut>(mut self, shutdown: CancellationToken, mut answer: F)
    where
        F: FnMut(String, Bytes) -> Fut,
        Fut: Future<Output = Result<Vec<u8>, String>>,
    {
        let mut answering = FuturesUnordered::new();
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = answering.next(), if !answering.is_empty() => continue,
                m = self.subs.next(), if answering.len() < IN_FLIGHT => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let subject = msg.subject.to_string();
            let reply_to = answer(subject.clone(), msg.payload);
            let client = &self.client;
            answering.push(async move {
                match reply_to.await {
                    Ok(bytes) => {
                        if let Err(e) = client.publish(reply, bytes.into()).await {
                            tracing::warn!(error = %e, subject, "cannot answer a query");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, subject, "cannot encode a query answer")
                    }
                }
            });
        }
        // The subscriptions ended: the answers under way still go out.
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = async { while answering.next().await.is_some() {} } => {}
        }
    }
}

/// Queries a service answers at once (see [`Queries::serve`]).
pub const IN_FLIGHT: usize = 64;
