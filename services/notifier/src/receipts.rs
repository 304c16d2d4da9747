//! Receipts: every outcome goes to the incidents service as a `delivery`
//! command, which puts it on the incident's timeline. The command id is
//! the delivery id and outcome, so publishing it again (after a crash,
//! or when a redelivered message finds its record final) is dropped by
//! JetStream's duplicate window.

use async_nats::jetstream;
use tocsin_proto::{
    codec,
    command::{Action, Command, IncidentRef},
    incident::Actor,
    notify::Delivery,
    Envelope,
};
use tokio_util::sync::CancellationToken;

/// Publishes `receipt` for `incident` until JetStream takes it; false when
/// `shutdown` came first.
pub(crate) async fn publish(
    js: &jetstream::Context,
    now: jiff::Timestamp,
    incident: uuid::Uuid,
    receipt: &Delivery,
    shutdown: &CancellationToken,
) -> bool {
    let cmd = Command {
        id: format!("dlv:{}:{}", receipt.id, receipt.outcome.as_str()),
        actor: Actor::new("notifier", "tocsin"),
        action: Action::Delivery {
            incident: IncidentRef::Id(incident),
            delivery: receipt.clone(),
        },
    };
    let payload = match codec::encode(&Envelope::new("notifier", now, cmd.clone())) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a receipt");
            return true;
        }
    };
    let mut backoff = tocsin_runtime::retry::Backoff::standard();
    loop {
        let publish = tocsin_runtime::bus::message(payload.clone(), cmd.id.clone(), None, &[]);
        let r = match js.send_publish(cmd.subject(), publish).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(()) => return true,
            Err(e) => tracing::warn!(error = %e, "cannot publish a delivery receipt; retrying"),
        }
        if !backoff.wait(shutdown).await {
            return false;
        }
    }
}
