//! What every service is given: one [`ServiceContext`], so every service's
//! `run` has the same shape, `run(config, &ctx, listener)` (the listener:
//! a socket bound before start, for the services that serve HTTP), and the
//! composition in `tocsin up` is a loop.

use std::sync::Arc;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{Health, Metrics},
    clock::Clock,
    progress::Watermark,
    streams::JetStreamConfig,
};

/// The NATS client and JetStream context (with the service's own
/// credentials), the process's metrics and health, the one clock, the
/// JetStream settings (replicas, retention), the shutdown signal and the
/// service's watermark.
#[derive(Clone)]
pub struct ServiceContext {
    pub js: jetstream::Context,
    pub metrics: Metrics,
    pub health: Health,
    pub clock: Arc<dyn Clock>,
    pub jetstream: JetStreamConfig,
    pub shutdown: CancellationToken,
    /// Where the service reports how far it has got (see
    /// [`crate::progress`]).
    pub watermark: Watermark,
}

impl ServiceContext {
    /// A context for one service on `js` (tests, benches and tools that
    /// start a service by itself): its own metrics and health.
    pub fn standalone(js: jetstream::Context, clock: Arc<dyn Clock>) -> ServiceContext {
        ServiceContext {
            js,
            metrics: Metrics::new(),
            health: Health::new(),
            clock,
            jetstream: JetStreamConfig::default(),
            shutdown: CancellationToken::new(),
            watermark: Watermark::detached("standalone"),
        }
    }

    /// The NATS client behind the JetStream context.
    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }
}
