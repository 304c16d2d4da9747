//! What every service is given: one [`ServiceContext`], so every service's
//! `run` has the same shape and the composition in `tocsin up` is a loop.

use std::sync::Arc;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{Health, Metrics},
    clock::Clock,
    streams::JetStreamConfig,
};

/// The NATS client and JetStream context (with the service's own
/// credentials), the process's metrics and health, the one clock, the
/// JetStream settings (replicas, retention) and the shutdown signal.
#[derive(Clone)]
pub struct ServiceContext {
    pub js: jetstream::Context,
    pub metrics: Metrics,
    pub health: Health,
    pub clock: Arc<dyn Clock>,
    pub jetstream: JetStreamConfig,
    pub shutdown: CancellationToken,
}

impl ServiceContext {
    /// The NATS client behind the JetStream context.
    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }
}
