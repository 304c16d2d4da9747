//! The envelope around every bus payload.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Version of the payload schema. Readers accept messages whose version is
/// not newer than theirs; bump only for a breaking change (new optional fields
/// do not need one).
pub const SCHEMA_VERSION: u32 = 1;

/// Every message on the bus is an `Envelope<T>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub schema: u32,
    /// Who sent it: the integration name of an ingest token, or the service.
    pub source: String,
    pub received_at: Timestamp,
    /// W3C `traceparent` of the request that produced it, also sent as a header.
    #[serde(default)]
    pub traceparent: Option<String>,
    pub body: T,
}

impl<T> Envelope<T> {
    pub fn new(source: impl Into<String>, received_at: Timestamp, body: T) -> Self {
        Envelope {
            schema: SCHEMA_VERSION,
            source: source.into(),
            received_at,
            traceparent: None,
            body,
        }
    }

    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }
}

impl<T> Envelope<Vec<T>> {
    /// Each item of the body in an envelope of its own (the same source,
    /// receive time and trace context), in order.
    pub fn split(self) -> impl Iterator<Item = Envelope<T>> {
        let Envelope {
            schema,
            source,
            received_at,
            traceparent,
            body,
        } = self;
        body.into_iter().map(move |item| Envelope {
            schema,
            source: source.clone(),
            received_at,
            traceparent: traceparent.clone(),
            body: item,
        })
    }
}
