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
    /// JetStream refused to set up a consumer.
    #[error("JetStream: {0}")]
    JetStream(String),
}
