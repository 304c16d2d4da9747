//! Commands and queries over NATS, as the `chatops` identity: a command is
//! stored on COMMANDS (with its id as `Nats-Msg-Id`) and its answer awaited
//! on this process's inbox; queries are request/reply.

use std::{sync::Arc, time::Duration};

use async_nats::{jetstream, Client};
use futures::StreamExt;
use tocsin_proto::{
    codec,
    command::{Action, Command, CommandReply},
    incident::{Actor, IncidentSummary},
    subjects::headers,
    Envelope,
};
use tocsin_runtime::clock::Clock;

use crate::ChatopsError;

/// What became of a command.
// Built and read one at a time: boxing the summary would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Accepted {
        message: String,
        incident: Option<IncidentSummary>,
    },
    Rejected {
        reason: String,
    },
}

#[derive(Clone)]
pub(crate) struct Bus {
    client: Client,
    js: jetstream::Context,
    clock: Arc<dyn Clock>,
    patience: Duration,
}

impl Bus {
    pub(crate) fn new(
        client: Client,
        js: jetstream::Context,
        clock: Arc<dyn Clock>,
        patience: Duration,
    ) -> Self {
        Bus {
            client,
            js,
            clock,
            patience,
        }
    }

    /// Sends `action` as `actor` and waits for the incidents service's
    /// answer; `stored` is told once the command is stored on COMMANDS, or
    /// why it could not be.
    pub(crate) async fn command(
        &self,
        actor: Actor,
        action: Action,
        stored: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) -> Result<Outcome, ChatopsError> {
        let cmd = Command::new(actor, action);
        let sent = async {
            let inbox = self.client.new_inbox();
            let replies =
                self.client.subscribe(inbox.clone()).await.map_err(|e| {
                    ChatopsError::Bus(format!("cannot subscribe for the answer: {e}"))
                })?;
            let env = Envelope::new("chatops", self.clock.now(), cmd.clone());
            let payload = codec::encode(&env).map_err(|e| ChatopsError::Bus(e.to_string()))?;
            // Sent again while it is not stored (a lost publish, a stream
            // leader being elected), within the patience: the presser need
            // not press again.
            tocsin_runtime::bus::store(
                &self.js,
                &cmd.subject(),
                tocsin_runtime::bus::message(
                    payload,
                    cmd.id.clone(),
                    None,
                    &[(headers::REPLY_TO, inbox.as_str())],
                ),
                self.patience,
            )
            .await
            .map_err(|e| {
                ChatopsError::Bus(format!(
                    "JetStream did not confirm storing the command: {e}"
                ))
            })?;
            Ok::<_, ChatopsError>(replies)
        }
        .await;
        if let Some(stored) = stored {
            let _ = stored.send(sent.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
        let mut replies = sent?;
        let msg = tokio::time::timeout(self.patience, replies.next())
            .await
            .map_err(|_| ChatopsError::NoAnswer)?
            .ok_or(ChatopsError::NoAnswer)?;
        Ok(
            match codec::decode::<CommandReply>(&msg.payload)
                .map_err(|e| ChatopsError::Bus(e.to_string()))?
            {
                CommandReply::Accepted {
                    message, incident, ..
                } => Outcome::Accepted { message, incident },
                CommandReply::Rejected { reason, .. } => Outcome::Rejected { reason },
            },
        )
    }

    /// Asks `subject` and decodes the answer.
    pub(crate) async fn query<Q: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        subject: &'static str,
        q: &Q,
    ) -> Result<R, ChatopsError> {
        let payload = codec::encode(q).map_err(|e| ChatopsError::Bus(e.to_string()))?;
        let resp =
            tokio::time::timeout(self.patience, self.client.request(subject, payload.into()))
                .await
                .map_err(|_| ChatopsError::NoAnswer)?
                .map_err(|e| ChatopsError::Bus(format!("query {subject} failed: {e}")))?;
        codec::decode(&resp.payload).map_err(|e| ChatopsError::Bus(e.to_string()))
    }

    pub(crate) fn now(&self) -> jiff::Timestamp {
        self.clock.now()
    }

    /// The JetStream context, under `jetstream.domain`'s prefix.
    pub(crate) fn js(&self) -> &jetstream::Context {
        &self.js
    }
}
