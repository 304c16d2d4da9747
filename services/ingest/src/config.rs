//! `ingest:` section of the config file.

use std::{collections::BTreeSet, net::SocketAddr};

use serde::Deserialize;
use tocsin_runtime::config::{one_secret, HumanDuration, Secret, SecretFile};

/// Shortest token accepted: a bearer token is a password for the whole
/// alert pipeline, so it must not be guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// Configuration of the ingest service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawIngestConfig")]
pub struct IngestConfig {
    /// Address the HTTP receivers listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Largest request body accepted; larger gets 413. Default 1 MiB.
    pub max_body_bytes: usize,
    /// How long to wait for JetStream to acknowledge a request's alerts
    /// before answering 503. Default 5s.
    pub publish_timeout: HumanDuration,
    /// `Retry-After` sent with 503 answers. Default 5s.
    pub retry_after: HumanDuration,
    /// Who may send alerts: each token names its source (integration).
    pub tokens: Vec<IngestToken>,
}

/// One accepted bearer token and the integration it identifies.
#[derive(Debug, Clone)]
pub struct IngestToken {
    /// Integration name, e.g. `prod-alertmanager`; recorded on every alert.
    pub source: String,
    pub token: Secret,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngestConfig {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_publish_timeout")]
    publish_timeout: HumanDuration,
    #[serde(default = "default_retry_after")]
    retry_after: HumanDuration,
    #[serde(default)]
    tokens: Vec<RawToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    source: String,
    #[serde(default)]
    token: Option<Secret>,
    #[serde(default)]
    token_file: Option<SecretFile>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_body() -> usize {
    1024 * 1024
}
fn default_publish_timeout() -> HumanDuration {
    HumanDuration::secs(5)
}
fn default_retry_after() -> HumanDuration {
    HumanDuration::secs(5)
}

impl TryFrom<RawIngestConfig> for IngestConfig {
    type Error = String;
    fn try_from(r: RawIngestConfig) -> Result<Self, String> {
        if r.tokens.is_empty() {
            return Err(
                "ingest.tokens is empty: nobody could send alerts. Add one, e.g.\n  \
                 tokens:\n    - source: alertmanager\n      token: ${TOCSIN_INGEST_TOKEN}"
                    .into(),
            );
        }
        if r.max_body_bytes < 1024 {
            return Err(format!(
                "ingest.max_body_bytes is {}; use at least 1024 (default 1048576)",
                r.max_body_bytes
            ));
        }
        let mut seen = BTreeSet::new();
        let mut tokens = Vec::with_capacity(r.tokens.len());
        for (i, t) in r.tokens.into_iter().enumerate() {
            if !tocsin_proto::subjects::is_valid_token(&t.source) {
                return Err(format!(
                    "ingest.tokens[{i}].source {:?} is not a valid name; use 1-64 letters, digits, - or _",
                    t.source
                ));
            }
            if !seen.insert(t.source.clone()) {
                return Err(format!(
                    "ingest.tokens[{i}].source {:?} is used twice; give each token its own source name",
                    t.source
                ));
            }
            let token = one_secret("token", t.token, t.token_file)?.ok_or_else(|| {
                format!(
                    "ingest.tokens[{i}] ({}) has no `token` or `token_file`; set one",
                    t.source
                )
            })?;
            if token.expose().chars().count() < MIN_TOKEN_LEN {
                return Err(format!(
                    "ingest.tokens[{i}] ({}): token is shorter than {MIN_TOKEN_LEN} characters; \
                     use a long random value, e.g. from `openssl rand -hex 24`",
                    t.source
                ));
            }
            tokens.push(IngestToken {
                source: t.source,
                token,
            });
        }
        Ok(IngestConfig {
            listen: r.listen,
            max_body_bytes: r.max_body_bytes,
            publish_timeout: r.publish_timeout,
            retry_after: r.retry_after,
            tokens,
        })
    }
}

impl IngestConfig {
    /// A config for tests and examples: one token, defaults elsewhere.
    pub fn with_token(source: &str, token: &str) -> Self {
        IngestConfig {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
            publish_timeout: default_publish_timeout(),
            retry_after: default_retry_after(),
            tokens: vec![IngestToken {
                source: source.to_string(),
                token: Secret::new(token),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn load(yaml: &str) -> Result<IngestConfig, tocsin_runtime::config::ConfigError> {
        tocsin_runtime::config::from_str(Path::new("t.yaml"), yaml)
    }

    #[test]
    fn valid() {
        let c = load("tokens:\n  - source: am\n    token: 0123456789abcdef0123\n").unwrap();
        assert_eq!(c.tokens[0].source, "am");
        assert_eq!(c.max_body_bytes, 1 << 20);
    }

    #[test]
    fn invalid() {
        let check = |yaml: &str, fragment: &str| {
            let err = load(yaml).unwrap_err().to_string();
            assert!(err.contains(fragment), "{yaml}\n=> {err}");
        };
        check("listen: 1.2.3.4\n", "invalid socket address");
        check("tokens: []\n", "ingest.tokens is empty");
        check(
            "tokens:\n  - source: am\n    token: short\n",
            "shorter than 16",
        );
        check(
            "tokens:\n  - source: a.b\n    token: 0123456789abcdef0123\n",
            "not a valid name",
        );
        check(
            "tokens:\n  - source: a\n    token: 0123456789abcdef0123\n  - source: a\n    token: 0123456789abcdef0124\n",
            "used twice",
        );
        check("tokens:\n  - source: a\n", "has no `token`");
        check(
            "tokens:\n  - source: a\n    tokn: x\n",
            "unknown field `tokn`",
        );
    }
}
