//! Errors of the incidents service, named by what the caller must do.

#[derive(Debug, thiserror::Error)]
pub enum IncidentsError {
    /// The `incidents:` config is wrong (bad matcher, unknown timezone ...).
    #[error("incidents config: {0}")]
    Config(String),
    /// The projection store cannot be opened even after wiping it (disk full,
    /// permissions): fix the data directory.
    #[error("projection store at {dir}: {source}")]
    Store {
        dir: String,
        source: crate::store::StoreError,
    },
    /// Reading the projection store stopped short (its thread panicked or
    /// the runtime is shutting down).
    #[error("reading the projection store: {0}")]
    StoreRead(String),
    /// JetStream refused to set up a consumer.
    #[error("JetStream: {0}")]
    JetStream(String),
}
