//! The remediation service's error type.

#[derive(Debug, thiserror::Error)]
pub enum RemediationError {
    /// The `remediation:` section is wrong.
    #[error("remediation config: {0}")]
    Config(String),
    /// A KV bucket cannot be opened: check NATS and the service's permissions.
    #[error("remediation state: {0}")]
    State(String),
}
