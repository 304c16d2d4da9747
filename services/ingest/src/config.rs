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
    /// Request bodies held at once, across requests (read, parsed or being
    /// published); a request that would go over gets 503 + `Retry-After`.
    /// At least `max_body_bytes`. Default 32 MiB.
    pub max_inflight_bytes: usize,
    /// Open connections at most. At the cap a new connection closes the
    /// oldest one that has no request in progress, or is refused when every
    /// one has. Default 4096.
    pub max_connections: usize,
    /// A connection that sends nothing for this long while no request is in
    /// progress (new, or kept alive after an answer) is closed. Default 5s.
    pub idle_timeout: HumanDuration,
    /// From when the server waits for a request (connection opened, or the
    /// previous answer sent) to the last byte of its headers; then the
    /// connection is closed. At least `idle_timeout`. Default 10s.
    pub header_read_timeout: HumanDuration,
    /// Whole-body deadline: a request body not received within this time
    /// after its headers gets 408. Default 30s.
    pub body_read_timeout: HumanDuration,
    /// Bounds on what one request and one alert may carry.
    pub limits: Limits,
    /// The dead-man's switches a ping may name (`incidents.heartbeats` of
    /// the same config file, filled in by the `tocsin` command); a ping for
    /// any other name gets 404. `None`: any valid name is taken.
    pub heartbeats: Option<Vec<String>>,
}

/// Bounds on alerts, checked before anything is published. An alert over
/// any of them gets 400 (413 for the count per request and the whole
/// alert's size) naming the field and the key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Alerts in one request. Alertmanager sends far fewer (its
    /// `max_alerts` per webhook is unlimited by default, but a group of
    /// over a thousand alerts is rare). Default 1000.
    pub alerts_per_request: usize,
    /// Labels on one alert. Default 64.
    pub labels_per_alert: usize,
    /// Bytes of one label or annotation name. Default 256.
    pub label_name_bytes: usize,
    /// Bytes of one label value. Default 4096.
    pub label_value_bytes: usize,
    /// Annotations on one alert. Default 64.
    pub annotations_per_alert: usize,
    /// Bytes of one annotation value. Default 16384.
    pub annotation_value_bytes: usize,
    /// Bytes of one alert as stored on the bus (labels, annotations, links
    /// and Alertmanager's group labels together). Default 65536.
    pub alert_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            alerts_per_request: 1000,
            labels_per_alert: 64,
            label_name_bytes: 256,
            label_value_bytes: 4096,
            annotations_per_alert: 64,
            annotation_value_bytes: 16 * 1024,
            alert_bytes: 64 * 1024,
        }
    }
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
    #[serde(default = "default_max_inflight")]
    max_inflight_bytes: usize,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_idle_timeout")]
    idle_timeout: HumanDuration,
    #[serde(default = "default_header_read_timeout")]
    header_read_timeout: HumanDuration,
    #[serde(default = "default_body_read_timeout")]
    body_read_timeout: HumanDuration,
    #[serde(default)]
    limits: Limits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    source: String,
    #[serde(default, deserialize_with = "token_value")]
    token: Option<Secret>,
    #[serde(default, deserialize_with = "token_file")]
    token_file: Option<SecretFile>,
}

/// A token is checked where it is written, so `check-config` points at its
/// line.
fn long_enough(token: &str) -> Result<(), String> {
    if token.chars().count() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is shorter than {MIN_TOKEN_LEN} characters; \
             use a long random value, e.g. from `openssl rand -hex 24`"
        ));
    }
    Ok(())
}

fn token_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Secret::deserialize_checked(d, long_enough).map(Some)
}

fn token_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SecretFile>, D::Error> {
    SecretFile::deserialize_checked(d, long_enough).map(Some)
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
fn default_max_inflight() -> usize {
    32 * 1024 * 1024
}
fn default_max_connections() -> usize {
    4096
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration::secs(5)
}
fn default_header_read_timeout() -> HumanDuration {
    HumanDuration::secs(10)
}
fn default_body_read_timeout() -> HumanDuration {
    HumanDuration::secs(30)
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
        if r.max_inflight_bytes < r.max_body_bytes {
            return Err(format!(
                "ingest.max_inflight_bytes ({}) is below ingest.max_body_bytes ({}): a request of the \
                 largest accepted size could never be taken; raise max_inflight_bytes (default 33554432)",
                r.max_inflight_bytes, r.max_body_bytes
            ));
        }
        if r.max_inflight_bytes > u32::MAX as usize {
            return Err(format!(
                "ingest.max_inflight_bytes is {}; the most is {} (4 GiB)",
                r.max_inflight_bytes,
                u32::MAX
            ));
        }
        if r.max_connections < 16 {
            return Err(format!(
                "ingest.max_connections is {}; use at least 16 (default 4096)",
                r.max_connections
            ));
        }
        for (name, d) in [
            ("idle_timeout", r.idle_timeout),
            ("header_read_timeout", r.header_read_timeout),
            ("body_read_timeout", r.body_read_timeout),
        ] {
            if d.get().is_zero() {
                return Err(format!(
                    "ingest.{name} is 0; a connection could then be held open forever. Use e.g. 10s"
                ));
            }
        }
        if r.header_read_timeout < r.idle_timeout {
            return Err(format!(
                "ingest.header_read_timeout ({}) is shorter than ingest.idle_timeout ({}); the header \
                 read timeout counts from when the server starts waiting, so it must be at least the idle timeout",
                r.header_read_timeout, r.idle_timeout
            ));
        }
        let l = &r.limits;
        for (name, v) in [
            ("alerts_per_request", l.alerts_per_request),
            ("labels_per_alert", l.labels_per_alert),
            ("label_name_bytes", l.label_name_bytes),
            ("label_value_bytes", l.label_value_bytes),
            ("annotations_per_alert", l.annotations_per_alert),
            ("annotation_value_bytes", l.annotation_value_bytes),
            ("alert_bytes", l.alert_bytes),
        ] {
            if v == 0 {
                return Err(format!(
                    "ingest.limits.{name} is 0: no alert could be accepted; remove the key for the default"
                ));
            }
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
            max_inflight_bytes: r.max_inflight_bytes,
            max_connections: r.max_connections,
            idle_timeout: r.idle_timeout,
            header_read_timeout: r.header_read_timeout,
            body_read_timeout: r.body_read_timeout,
            limits: r.limits,
            heartbeats: None,
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
            max_inflight_bytes: default_max_inflight(),
            max_connections: default_max_connections(),
            idle_timeout: default_idle_timeout(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            limits: Limits::default(),
            heartbeats: None,
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
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.max_connections, 4096);
        let c = load(
            "tokens:\n  - source: am\n    token: 0123456789abcdef0123\n\
             limits: {label_value_bytes: 1024, alerts_per_request: 10}\n",
        )
        .unwrap();
        assert_eq!(c.limits.label_value_bytes, 1024);
        assert_eq!(c.limits.alerts_per_request, 10);
        assert_eq!(c.limits.labels_per_alert, 64);
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
        let tok = "tokens:\n  - source: a\n    token: 0123456789abcdef0123\n";
        check(
            &format!("{tok}max_body_bytes: 2000000\nmax_inflight_bytes: 1000000\n"),
            "below ingest.max_body_bytes",
        );
        check(&format!("{tok}max_connections: 1\n"), "at least 16");
        check(
            &format!("{tok}max_inflight_bytes: 9999999999999\n"),
            "the most is 4294967295",
        );
        check(
            &format!("{tok}idle_timeout: 0\n"),
            "ingest.idle_timeout is 0",
        );
        check(
            &format!("{tok}idle_timeout: 20s\n"),
            "shorter than ingest.idle_timeout",
        );
        check(
            &format!("{tok}limits: {{alerts_per_request: 0}}\n"),
            "ingest.limits.alerts_per_request is 0",
        );
        check(
            &format!("{tok}limits: {{label_bytes: 5}}\n"),
            "unknown field `label_bytes`",
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            let cases = std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(256);
            ProptestConfig {
                cases,
                ..ProptestConfig::default()
            }
        }

        /// `key: value` lines of the ingest section with plausible and
        /// hostile values, in any order and indentation.
        fn section() -> impl Strategy<Value = String> {
            let key = prop::sample::select(vec![
                "listen",
                "max_body_bytes",
                "publish_timeout",
                "retry_after",
                "tokens",
                "max_inflight_bytes",
                "max_connections",
                "idle_timeout",
                "header_read_timeout",
                "body_read_timeout",
                "limits",
                "alerts_per_request",
                "label_value_bytes",
                "alert_bytes",
                "source",
                "token",
                "token_file",
                "- source",
            ]);
            let value = prop::sample::select(vec![
                "0",
                "1",
                "16",
                "1024",
                "18446744073709551616",
                "-1",
                "5s",
                "0s",
                "1h",
                "x",
                "127.0.0.1:0",
                "[::1]:8080",
                "0123456789abcdef0123",
                "${UNSET_FUZZ}",
                "[]",
                "{}",
                "{alerts_per_request: 0}",
                "~",
                "\"\"",
                "é",
            ]);
            let indent = prop::sample::select(vec!["", "  ", "    "]);
            prop::collection::vec((indent, key, value), 0..12).prop_map(|lines| {
                lines
                    .into_iter()
                    .map(|(i, k, v)| format!("{i}{k}: {v}\n"))
                    .collect()
            })
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn loading_never_panics(text in section()) {
                if let Ok(c) = load(&text) {
                    prop_assert!(c.max_inflight_bytes >= c.max_body_bytes);
                    prop_assert!(c.header_read_timeout >= c.idle_timeout);
                    prop_assert!(!c.tokens.is_empty());
                }
            }
        }
    }
}
