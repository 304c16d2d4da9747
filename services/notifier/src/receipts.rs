//! Receipts: every outcome goes to the incidents service as a `delivery`
//! command, which puts it on the incident's timeline. The command id is
//! the delivery id and outcome, so publishing it again (after a crash,
//! or when a redelivered message finds its record final) is dropped by
//! JetStream's duplicate window, or found by the incidents service among
//! the command ids the incident remembers.
//!
//! Each COMMANDS message is a synced write on the server, so receipts that
//! come within [`LINGER`] of each other go together, up to [`MAX_BATCH`], in
//! one message on `tocsin.cmd.delivery.batch` (an `Envelope<Vec<Command>>`,
//! message id made of their ids); a receipt alone goes on
//! `tocsin.cmd.delivery` as one command. A caller waits until JetStream has
//! its receipt, as before. If a message of several cannot be stored, its
//! receipts are published one at a time; if that works at once (a NATS
//! user whose permissions predate the batch subject), receipts go one at a
//! time for a minute.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream;
use tocsin_proto::{
    codec,
    command::{batch_subject, Action, Command, IncidentRef},
    incident::Actor,
    notify::Delivery,
    subjects::headers,
    Envelope,
};
use tocsin_runtime::clock::Clock;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How long the first receipt of a message waits for others to join it.
/// Only the receipt waits (its page has gone out); the NOTIFY message is
/// acknowledged that much later.
pub(crate) const LINGER: Duration = Duration::from_millis(10);
/// At most this many receipts a message.
pub(crate) const MAX_BATCH: usize = 64;
/// At most this many bytes a message of several (a receipt's detail is a
/// provider's bounded error text; 64 of them fit many times over).
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// After a message of several was refused, receipts go one at a time for
/// this long before the next is tried (a refused publish waits for its
/// acknowledgement's timeout first).
const ALONE_AFTER_REFUSAL: Duration = Duration::from_secs(60);

struct Item {
    cmd: Command,
    stored: oneshot::Sender<()>,
}

/// Hands receipts to the task that publishes them; cheap to share.
pub(crate) struct Receipts {
    tx: mpsc::UnboundedSender<Item>,
}

impl Receipts {
    /// Starts the publishing task (it ends when the `Receipts` is dropped
    /// and what it holds is stored, or no caller waits for it any more).
    pub(crate) fn start(js: jetstream::Context, clock: Arc<dyn Clock>) -> Receipts {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(js, clock, rx));
        Receipts { tx }
    }

    /// Publishes `receipt` for `incident` and waits until JetStream has
    /// it; false when `shutdown` came first.
    pub(crate) async fn publish(
        &self,
        incident: uuid::Uuid,
        receipt: &Delivery,
        shutdown: &CancellationToken,
    ) -> bool {
        let (stored, done) = oneshot::channel();
        let item = Item {
            cmd: command(incident, receipt),
            stored,
        };
        if self.tx.send(item).is_err() {
            return false;
        }
        tokio::select! {
            r = done => r.is_ok(),
            _ = shutdown.cancelled() => false,
        }
    }
}

fn command(incident: uuid::Uuid, receipt: &Delivery) -> Command {
    Command {
        id: format!("dlv:{}:{}", receipt.id, receipt.outcome.as_str()),
        actor: Actor::new("notifier", "tocsin"),
        action: Action::Delivery {
            incident: IncidentRef::Id(incident),
            delivery: receipt.clone(),
        },
    }
}

async fn run(js: jetstream::Context, clock: Arc<dyn Clock>, mut rx: mpsc::UnboundedReceiver<Item>) {
    let mut refused: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while items.len() < MAX_BATCH {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(i) => items.push(i),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let together = refused.is_none_or(|at| at.elapsed() >= ALONE_AFTER_REFUSAL);
        if store(&js, clock.now(), items, together).await {
            refused = Some(Instant::now());
        }
    }
}

/// Stores `items` (in one message if there are several and `together`,
/// else or failing that one at a time), retrying until JetStream has each
/// or no caller waits for it. True when a message of several was refused
/// while the same receipts one at a time were stored at once (a NATS user
/// without the batch subject); a failure both ways is the server's, not
/// the batch's.
async fn store(
    js: &jetstream::Context,
    now: jiff::Timestamp,
    mut items: Vec<Item>,
    together: bool,
) -> bool {
    let mut batch_failed = false;
    if items.len() > 1 && together {
        match publish_together(js, now, &items).await {
            Ok(()) => {
                for i in items {
                    let _ = i.stored.send(());
                }
                return false;
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    receipts = items.len(),
                    "cannot publish delivery receipts together; one at a time"
                );
                batch_failed = true;
            }
        }
    }
    let mut backoff = tocsin_runtime::retry::Backoff::standard();
    let mut first_round = true;
    loop {
        items.retain(|i| !i.stored.is_closed());
        if items.is_empty() {
            return false;
        }
        let results = futures::future::join_all(items.iter().map(|i| alone(js, now, &i.cmd))).await;
        let mut left = Vec::new();
        for (item, r) in items.into_iter().zip(results) {
            match r {
                Ok(()) => {
                    let _ = item.stored.send(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish a delivery receipt; retrying");
                    left.push(item);
                }
            }
        }
        if left.is_empty() {
            return batch_failed && first_round;
        }
        items = left;
        first_round = false;
        tokio::time::sleep(backoff.step()).await;
    }
}

async fn alone(js: &jetstream::Context, now: jiff::Timestamp, cmd: &Command) -> Result<(), String> {
    let payload = codec::encode(&Envelope::new("notifier", now, cmd)).map_err(|e| e.to_string())?;
    let publish = tocsin_runtime::bus::message(payload, cmd.id.clone(), None, &[]);
    stored(js, cmd.subject(), publish).await
}

async fn publish_together(
    js: &jetstream::Context,
    now: jiff::Timestamp,
    items: &[Item],
) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    let cmds: Vec<&Command> = items.iter().map(|i| &i.cmd).collect();
    let payload =
        codec::encode(&Envelope::new("notifier", now, &cmds)).map_err(|e| e.to_string())?;
    if payload.len() > MAX_BATCH_BYTES {
        return Err(format!("{} bytes", payload.len()));
    }
    let mut ids = Sha256::new();
    for c in &cmds {
        ids.update(c.id.as_bytes());
        ids.update(b"\n");
    }
    let id = format!("receipts:{}", hex::encode(&ids.finalize()[..16]));
    let items = cmds.len().to_string();
    let publish =
        tocsin_runtime::bus::message(payload, id, None, &[(headers::ITEMS, items.as_str())]);
    stored(js, batch_subject("delivery"), publish).await
}

/// Publishes `msg` and waits until JetStream has stored it.
async fn stored(
    js: &jetstream::Context,
    subject: String,
    msg: jetstream::message::PublishMessage,
) -> Result<(), String> {
    let ack = js
        .send_publish(subject, msg)
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(|_| ()).map_err(|e| e.to_string())
}
