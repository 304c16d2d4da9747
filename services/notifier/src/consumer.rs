//! Finishing a message both loops took: acknowledged for good, or handed
//! back with a delay. Opening and pulling are [`tocsin_runtime::pull`]'s.

use async_nats::jetstream::{self, AckKind};

use crate::deliver::Finish;

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
